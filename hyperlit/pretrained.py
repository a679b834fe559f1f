"""Keyword arguments for every diffusers ``from_pretrained`` call hyperlit makes."""

# local_files_only: nothing is ever downloaded (weights come from paths the user gives). low_cpu_mem_usage=False:
# its default (True) needs accelerate, which is not a dependency; diffusers would fall back to False anyway, after
# printing advice to install it.
OFFLINE = {"local_files_only": True, "low_cpu_mem_usage": False}
