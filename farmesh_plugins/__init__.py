"""Built-in FarMesh plugins, registered exactly like third-party ones."""
