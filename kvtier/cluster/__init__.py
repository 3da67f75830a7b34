"""Layer 7: many instances: the controller (which instance holds which chunks, fed by
kvtier's KV events), the instance-side registration, and the KV-aware router."""
