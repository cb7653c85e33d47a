"""Built-in backbone families (each module registers its families in vlm2vec.backbones.FAMILIES)."""
