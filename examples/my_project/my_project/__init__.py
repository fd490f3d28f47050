"""A small user project trained by distaccum through import paths (see ../config.yaml)."""
