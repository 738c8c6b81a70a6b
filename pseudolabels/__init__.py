"""embeddings -> pseudo-labels: an autoencoder's codes, PCA, DBSCAN / HDBSCAN / k-means.

``embed`` streams a dataset through a trained autoencoder into a Parquet table of codes;
``cluster`` projects them (PCA) and clusters them into the classes a classifier then
pretrains on (``pneumo train classify --labels``); ``outputs`` writes the labels and the
diagnostics (sizes, scatter, montage); ``dbscan`` is DBSCAN in bounded memory.

``pseudolabels`` imports ``training`` (models, the stream) and ``shards``.
"""
