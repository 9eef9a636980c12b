"""Package data shipped with jaxllm (see ``corpus/README.md``)."""
