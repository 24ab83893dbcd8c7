"""The media types of the registry API that regproxy reads and serves (OCI and Docker schema 2)."""

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST_V2 = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (MANIFEST_V2, MANIFEST_LIST_V2, OCI_MANIFEST, OCI_INDEX)
INDEX_TYPES = (MANIFEST_LIST_V2, OCI_INDEX)
#: What regproxy asks upstream for: every manifest type, so the cached answer suits any client.
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES)
