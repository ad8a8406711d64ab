"""Model folders. `albef/` is what a Hub repo carries as remote code: it imports nothing else of this package."""
