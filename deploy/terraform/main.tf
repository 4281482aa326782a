# relay on ECS Fargate behind an internal Network Load Balancer.
#
# Files by concern: ecs.tf (cluster, task, service), nlb.tf, security.tf (security groups),
# iam.tf (task and execution roles), secrets.tf (config parameter, optional secrets),
# logs.tf, dns.tf (optional Route 53 records), outputs.tf.

data "aws_region" "current" {}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_vpc" "this" {
  id = var.vpc_id
}

locals {
  # What the relay listens on inside the task: relay.config.defaults, which the image and the
  # Kubernetes manifests use too (tests/test_deploy.py keeps them in step). They are not inputs:
  # relay_config must bind these, and the NLB, target groups and security groups follow them.
  submission_port  = 587  # STARTTLS submission (RFC 6409)
  submissions_port = 465  # implicit TLS submission (RFC 8314 §3.3)
  metrics_port     = 9464 # /metrics, /healthz, /readyz
  health_path      = "/healthz"
  ready_path       = "/readyz"

  smtp_ports = {
    submission  = local.submission_port
    submissions = local.submissions_port
  }

  # The image's only writable path (its VOLUME); the task mounts a scratch volume there.
  data_dir    = "/var/lib/relay"
  config_path = "${local.data_dir}/relay.yaml"
  image_uid   = 10001
  image_user  = "${local.image_uid}:${local.image_uid}"

  container_name = "relay"

  # Store-and-forward (queue.mode: spool): the spool must outlive a task, and belongs to exactly
  # one relay instance. So with spool_efs each instance is a service of one task with its own
  # EFS access point; without it, one service runs desired_count interchangeable tasks.
  use_spool = var.spool_efs != null
  spool_dir = "${local.data_dir}/spool"
  instances = local.use_spool ? {
    for i in range(var.desired_count) : "spool-${i}" => { name = "${var.name}-${i}", desired_count = 1 }
    } : {
    service = { name = var.name, desired_count = var.desired_count }
  }

  create_cluster = var.ecs_cluster_arn == null
  cluster_arn    = local.create_cluster ? aws_ecs_cluster.this[0].arn : var.ecs_cluster_arn

  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  vpc_cidr           = data.aws_vpc.this.cidr_block
  dns_resolver_cidrs = var.dns_resolver_cidrs != null ? var.dns_resolver_cidrs : ["${cidrhost(local.vpc_cidr, 2)}/32"]
  aws_api_cidrs      = var.aws_api_cidrs != null ? var.aws_api_cidrs : [local.vpc_cidr]

  # Without a proxy the tasks talk to the upstream directly; with one, only the proxy does.
  use_proxy = length(var.egress_proxy_cidrs) > 0
  upstream_rules = local.use_proxy ? {} : {
    for pair in setproduct(var.upstream_cidrs, var.upstream_ports) :
    "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }

  # The secrets the relay itself reads at run time (task role), as opposed to the ones ECS
  # injects at start (execution role: the TLS certificate).
  task_secret_arns = concat(
    var.dkim_key_secret_arns,
    var.upstream_credential_secret_arns,
    [for s in aws_secretsmanager_secret.created : s.arn],
  )

  tags = merge({ "app" = "relay" }, var.tags)
}
