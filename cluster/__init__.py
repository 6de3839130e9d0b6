"""Launch: cluster YAMLs, KubeRay manifests, the local shaped-link launcher."""
