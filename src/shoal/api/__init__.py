"""The HTTP surface: OpenAI's client API and Shoal's operator API."""
