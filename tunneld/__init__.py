"""tunneld: an asyncio SSH tunnel daemon, and tunnelctl, its thin client."""

__version__ = "0.1.0"
