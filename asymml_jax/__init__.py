"""asymml-jax: AsymML's split of convolutional networks between a TEE and an accelerator."""

from asymml_jax import host_threads as _host_threads

# Before any JAX computation creates the CPU client (see host_threads).
_host_threads.ensure_callback_threads()
