"""SQLAlchemy base, engines and session factories."""

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from sqlalchemy import MetaData, create_engine
from sqlalchemy import exc as db
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The database is out of reach (refused, dropped, the pool exhausted), as opposed to refusing
# what was asked: worth waiting for, or a 503.
DATABASE_AWAY = (db.OperationalError, db.InterfaceError, db.TimeoutError, ConnectionError)


def database_away(exc: BaseException) -> bool:
    """`exc` says the database is out of reach (not that it refused what was asked)."""
    return isinstance(exc, DATABASE_AWAY) or bool(getattr(exc, "connection_invalidated", False))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def sync_engine(url: str) -> Engine:
    return create_engine(url, pool_pre_ping=True)


def async_engine(url: str, pool_size: int = 5) -> AsyncEngine:
    """`pool_size` connections kept open, as many again opened for bursts."""
    return create_async_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session


@asynccontextmanager
async def async_transaction(factory: async_sessionmaker) -> AsyncIterator[AsyncSession]:
    """One unit of work on the async side (the gateway): committed when the block ends,
    rolled back if it raises. A route's own session is `api.deps.SessionDep`."""
    async with factory() as session, session.begin():
        yield session
