"""The controller: observe the queue and the provider, decide (pure policy), act (provider calls)."""
