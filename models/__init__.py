"""Model data and recipes: the frequency corpus generator and the trained test-world family."""
