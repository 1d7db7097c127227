"""The engine: protocols and transports. Knows bytes, framing, flow control and limits; nothing of tokens or routes."""
