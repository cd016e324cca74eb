"""Models on this machine's disk: the store, the stores adopted read-only, the catalog of
every GGUF found in them, and pulls from the Hub (DESIGN §6).

`LocalModel` and `Catalog` (in `shoal.models.catalog`) are what the rest of the node
sees: the managed engines load a `LocalModel.path`, the advert lists the catalog.
"""
