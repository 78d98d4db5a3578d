"""What requests carry and answers show, the same way for every API family and for jobs:
JSON bodies (`json_body`), images (`image_checks`, off the event loop), structured output
(`output_format`), tools (`tools`), tokens' log probabilities (`logprobs`), and what the wire
formats share (`wire`)."""
