"""Model recipes: the default pair, the frequency corpus, the trained test-world family."""
