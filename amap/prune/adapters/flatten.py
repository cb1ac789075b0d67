"""FLatten adapters: being written."""
