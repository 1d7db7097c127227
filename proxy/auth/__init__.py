"""Identity sources and the token cache."""
