"""The client side: client connections, their authentication and session state."""
