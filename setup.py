"""The package layout (everything else is in pyproject.toml).

The repository keeps ``service/``, ``worker/`` and ``migrations/`` at its top level; a wheel installs
them inside the ``bocompress`` package, as ``bocompress.service``, ``bocompress.worker`` and
``bocompress.migrations``, so nothing named ``service`` or ``worker`` lands on a user's import path.
"""

from setuptools import find_namespace_packages, find_packages, setup

FOLDERS = ("service", "worker", "migrations")

packages = find_packages(include=["bocompress", "bocompress.*"])
package_dir = {"bocompress": "bocompress"}
for folder in FOLDERS:
    package_dir[f"bocompress.{folder}"] = folder
    # namespace discovery: data folders (dashboard templates, zoo weights) are packages too
    found = find_namespace_packages(folder, exclude=["*__pycache__*"])
    packages += [f"bocompress.{folder}"] + [f"bocompress.{folder}.{p}" for p in found]

setup(packages=packages, package_dir=package_dir)
