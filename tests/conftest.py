"""Every test sees 8 CPU devices: requested before JAX starts its backend."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
