"""Well-known defaults shared by the relay, its image and its deployment manifests.

The deploy tests read these so the Dockerfile, Kubernetes manifests and Terraform module
cannot drift from what the relay actually listens on.
"""

SUBMISSION_PORT = 587  # STARTTLS submission (RFC 6409)
SUBMISSIONS_PORT = 465  # implicit TLS submission (RFC 8314 §3.3)
METRICS_PORT = 9464  # Prometheus exporter port (registered default for OpenTelemetry/Prometheus exporters)
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"

# Inside the container image.
IMAGE_CONFIG_PATH = "/etc/relay/relay.yaml"
IMAGE_DATA_DIR = "/var/lib/relay"
IMAGE_UID = 10001

# The embedded dev default (`relay serve` with no config): loopback only.
DEV_PLAIN_PORT = 2525
DEV_SUBMISSION_PORT = 2587
DEV_SUBMISSIONS_PORT = 2465
