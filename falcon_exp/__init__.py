"""falcon-exp: what quantizing a large language model costs and buys, measured and tracked."""
