"""The corpus side: raw files to instances, the D_ref split, tokenizers, the token cache and its reading order."""
