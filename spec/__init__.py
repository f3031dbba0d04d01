"""SMoG's executable specification: derivations (spec/*.md) and a property suite that runs against
any implementation of the functional-core protocol (SMOG_IMPL, default `smog`). See spec/README.md."""
