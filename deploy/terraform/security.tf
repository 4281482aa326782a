# Two security groups.
#
#   clients --587/465--> [nlb SG] NLB --587/465, 9464 health checks--> [relay SG] tasks
#   tasks --> egress proxy (or upstream), DNS resolver, AWS API endpoints on 443
#
# Client access is decided at the NLB's group (CIDRs and security groups, both possible there).
# The task group admits SMTP and health checks only from the NLB's group: AWS matches that
# reference even with client IP preservation on, and it is tighter than admitting the subnets'
# or the VPC's CIDR, which the NLB's health-check source addresses would otherwise require
# (they are the NLB's private IPs, one per subnet, and not known before it exists).
# Prometheus reaches 9464 directly from var.monitoring_cidrs.

resource "aws_security_group" "nlb" {
  name        = "${var.name}-nlb"
  description = "relay NLB: SMTP submission from allowed clients"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nlb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "relay" {
  name        = "${var.name}-task"
  description = "relay tasks: SMTP and health checks from the NLB, metrics from monitoring"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-task" })

  lifecycle {
    create_before_destroy = true

    precondition {
      condition     = length(var.egress_proxy_cidrs) > 0 || length(var.upstream_cidrs) > 0
      error_message = "Set egress_proxy_cidrs (delivery through the proxy) or upstream_cidrs (direct delivery): the relay needs a way out."
    }
    precondition {
      condition     = length(var.allowed_client_cidrs) + length(var.allowed_client_security_group_ids) > 0
      error_message = "Set allowed_client_cidrs or allowed_client_security_group_ids: no client could reach the relay."
    }
  }
}

# --- NLB: clients in ---------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "nlb_submission_from_cidr" {
  for_each          = toset(var.allowed_client_cidrs)
  security_group_id = aws_security_group.nlb.id
  description       = "SMTP submission (STARTTLS) from allowed clients"
  ip_protocol       = "tcp"
  from_port         = local.submission_port
  to_port           = local.submission_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "nlb_submissions_from_cidr" {
  for_each          = toset(var.allowed_client_cidrs)
  security_group_id = aws_security_group.nlb.id
  description       = "SMTP submissions (implicit TLS) from allowed clients"
  ip_protocol       = "tcp"
  from_port         = local.submissions_port
  to_port           = local.submissions_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "nlb_submission_from_sg" {
  for_each                     = toset(var.allowed_client_security_group_ids)
  security_group_id            = aws_security_group.nlb.id
  description                  = "SMTP submission (STARTTLS) from allowed client security groups"
  ip_protocol                  = "tcp"
  from_port                    = local.submission_port
  to_port                      = local.submission_port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_ingress_rule" "nlb_submissions_from_sg" {
  for_each                     = toset(var.allowed_client_security_group_ids)
  security_group_id            = aws_security_group.nlb.id
  description                  = "SMTP submissions (implicit TLS) from allowed client security groups"
  ip_protocol                  = "tcp"
  from_port                    = local.submissions_port
  to_port                      = local.submissions_port
  referenced_security_group_id = each.value
}

# --- NLB: to the tasks -------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "nlb_to_relay_submission" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Forward SMTP submission to relay tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.submission_port
  to_port                      = local.submission_port
  referenced_security_group_id = aws_security_group.relay.id
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_relay_submissions" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Forward SMTP submissions to relay tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.submissions_port
  to_port                      = local.submissions_port
  referenced_security_group_id = aws_security_group.relay.id
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_relay_health" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Health checks to relay /readyz on the metrics port"
  ip_protocol                  = "tcp"
  from_port                    = local.metrics_port
  to_port                      = local.metrics_port
  referenced_security_group_id = aws_security_group.relay.id
}

# --- Tasks: in ---------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "relay_submission_from_nlb" {
  security_group_id            = aws_security_group.relay.id
  description                  = "SMTP submission through the NLB"
  ip_protocol                  = "tcp"
  from_port                    = local.submission_port
  to_port                      = local.submission_port
  referenced_security_group_id = aws_security_group.nlb.id
}

resource "aws_vpc_security_group_ingress_rule" "relay_submissions_from_nlb" {
  security_group_id            = aws_security_group.relay.id
  description                  = "SMTP submissions through the NLB"
  ip_protocol                  = "tcp"
  from_port                    = local.submissions_port
  to_port                      = local.submissions_port
  referenced_security_group_id = aws_security_group.nlb.id
}

resource "aws_vpc_security_group_ingress_rule" "relay_health_from_nlb" {
  security_group_id            = aws_security_group.relay.id
  description                  = "NLB health checks (/readyz) on the metrics port"
  ip_protocol                  = "tcp"
  from_port                    = local.metrics_port
  to_port                      = local.metrics_port
  referenced_security_group_id = aws_security_group.nlb.id
}

resource "aws_vpc_security_group_ingress_rule" "relay_metrics_from_monitoring" {
  for_each          = toset(var.monitoring_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "Prometheus scrapes /metrics"
  ip_protocol       = "tcp"
  from_port         = local.metrics_port
  to_port           = local.metrics_port
  cidr_ipv4         = each.value
}

# --- Tasks: out --------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "relay_to_proxy" {
  for_each          = toset(var.egress_proxy_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "Egress proxy (SOCKS5 / HTTP CONNECT) to the upstream"
  ip_protocol       = "tcp"
  from_port         = var.egress_proxy_port
  to_port           = var.egress_proxy_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "relay_to_upstream" {
  for_each          = local.upstream_rules
  security_group_id = aws_security_group.relay.id
  description       = "Direct delivery to the upstream (no proxy configured)"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

# Security groups do not filter traffic to the Amazon-provided resolver (VPC base + 2), but do
# filter a Route 53 Resolver endpoint or a resolver of your own: the rules state the intent and
# cover both. TCP as well as UDP: large answers (DKIM keys, long SPF records) fall back to TCP.
resource "aws_vpc_security_group_egress_rule" "relay_dns_udp" {
  for_each          = toset(local.dns_resolver_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "DNS (UDP) to the VPC resolver"
  ip_protocol       = "udp"
  from_port         = 53
  to_port           = 53
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "relay_dns_tcp" {
  for_each          = toset(local.dns_resolver_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "DNS (TCP) to the VPC resolver"
  ip_protocol       = "tcp"
  from_port         = 53
  to_port           = 53
  cidr_ipv4         = each.value
}

# The spool's EFS mount targets (NFS), only with spool_efs.
resource "aws_vpc_security_group_egress_rule" "relay_spool_efs" {
  for_each                     = local.use_spool ? toset([var.spool_efs.mount_target_security_group_id]) : toset([])
  security_group_id            = aws_security_group.relay.id
  description                  = "NFS to the spool's EFS mount targets"
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  referenced_security_group_id = each.value
}

# On Fargate the image pull, the log driver and secret injection use the task's own network
# interface, so these go through this group too, as do the relay's Secrets Manager calls.
resource "aws_vpc_security_group_egress_rule" "relay_aws_api" {
  for_each          = toset(local.aws_api_cidrs)
  security_group_id = aws_security_group.relay.id
  description       = "HTTPS to AWS APIs (ECR, Logs, SSM, Secrets Manager, KMS)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "relay_aws_api_prefix_list" {
  for_each          = toset(var.aws_api_prefix_list_ids)
  security_group_id = aws_security_group.relay.id
  description       = "HTTPS to AWS services behind gateway endpoints (S3 for ECR layers)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = each.value
}
