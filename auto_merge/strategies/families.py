"""Parameter families of the layer-wise strategies: tensors are grouped by name filters (e.g. `mlp`, `self_attn`), and
every tensor no filter matches, including the embeddings, the final norm and the head, is in the `rest` family. The
reference implementation called that family `base`; its files are read by auto_merge/formats/reference_lfs.py.
"""

REST = "rest"
