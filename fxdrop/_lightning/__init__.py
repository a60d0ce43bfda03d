"""The pieces of `fxdrop.lightning`'s `LayerDropping`, one concept each: the Lightning internals
the loader swap needs (`internals.py`), the user's batches and the feed as a loader
(`batches.py`), what the callback changes on the user's objects and puts back (`changes.py`),
and the learning rate still to come (`rates_ahead.py`). Imported only through
`fxdrop.lightning`, which checks that Lightning is installed."""
