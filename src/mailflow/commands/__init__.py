"""Commands room: one module per CLI noun (`mailflow <noun> <verb>`), imported by cli.py only
when its command runs; each formats what a room returns and calls the same functions the API will."""
