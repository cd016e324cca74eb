"""The mesh: finding peers, knowing their state, and keeping them."""
