"""Which backend or node serves a request, and trying the next one when it fails."""
