"""Models on this machine's disk: the store, the stores adopted read-only, the catalog of
every GGUF found in them, and pulls from the Hub (DESIGN §6).

`LocalModel` and `Catalog` (in `shoal.models.catalog`) are what the rest of the node
sees: the managed engines load a `LocalModel.path`, the advert lists the catalog.

- `names`: the check every model name passes where it enters; the names files get (pure)
- `stores`: where the stores are, and walking each layout for GGUFs
- `gguf_header`: what a GGUF's header says (architecture, quantization, shapes)
- `catalog`: `ModelCatalog`, the stores' GGUFs merged and named, rescanned cheaply
- `remove`: `shoal models rm`, in the store Shoal writes only
- `pull`, `pull_refs`: `shoal models pull` from the Hub
"""
