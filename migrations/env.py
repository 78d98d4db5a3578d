from alembic import context
from sqlalchemy import create_engine, pool

import billing.files  # noqa: F401
import billing.models  # noqa: F401  (registers the tables on Base.metadata)
import tuning.models  # noqa: F401
import webhooks.models  # noqa: F401
from billing.db import Base

url = context.config.attributes["database_url"]
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
