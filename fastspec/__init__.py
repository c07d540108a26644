"""fastspec: the galaxy-spectrum autoencoder of Melchior, Hahn & Liang (2022), fast."""
__version__ = "0.1.0"
