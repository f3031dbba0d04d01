"""Example implementations judged by the spec from the outside (see spec/README.md, "Writing an adapter")."""
