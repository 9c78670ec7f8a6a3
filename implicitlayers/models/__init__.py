"""Built-in instances of `ImplicitLayer`: DEQ, JIIO, iMAML, LyaDEQ."""
