"""One module per scenario; see bench/harness.py for the contract."""
