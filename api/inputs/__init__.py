"""What requests carry, checked and translated the same way for every API family: JSON bodies
(`json_body`), images (`image_checks`, off the event loop), structured output
(`output_format`), tools (`tools`), and what the wire formats share (`wire`)."""
