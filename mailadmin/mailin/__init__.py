"""Mail in: the one delivery use-case and its doors (LMTP, the pipe command, imports)."""
