"""What every request passes before a route: its URL, its credential before its body, the
body's size and pace (`limits`), connections per client (`connections`), failed credentials
(`throttle`), and the headers every answer carries (`security_headers`)."""
