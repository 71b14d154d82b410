"""Adapters for frameworks loopguard does not depend on (they use only loopguard's public API)."""
