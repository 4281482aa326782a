# An internal NLB with plain TCP listeners: TLS terminates in the relay, because 587 speaks
# STARTTLS (RFC 3207), which a load balancer cannot terminate, and the relay must see the TLS
# session to allow AUTH only after it (RFC 4954 §4).

resource "aws_lb" "this" {
  name               = var.name
  internal           = true
  load_balancer_type = "network"
  subnets            = var.subnet_ids
  security_groups    = [aws_security_group.nlb.id]

  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection

  # NLBs write access logs for TLS listeners only, so with these TCP listeners they stay empty;
  # the relay's own log has one JSON line per message. Off unless var.nlb_access_logs is set.
  dynamic "access_logs" {
    for_each = var.nlb_access_logs == null ? [] : [var.nlb_access_logs]
    content {
      bucket  = access_logs.value.bucket
      prefix  = access_logs.value.prefix
      enabled = true
    }
  }

  tags = local.tags
}

resource "aws_lb_target_group" "smtp" {
  for_each = local.smtp_ports

  name        = "${var.name}-${each.value}"
  port        = each.value
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = var.vpc_id

  # The relay admits clients by source address (clients.networks): it must see theirs, not the
  # NLB's. The task security group still admits only the NLB's security group (see security.tf).
  preserve_client_ip = true

  # Let open SMTP sessions finish on a task that is being replaced.
  deregistration_delay = 120

  # Route to a task only when it is ready (keys loaded, upstream path reachable), not merely alive.
  health_check {
    protocol            = "HTTP"
    port                = local.metrics_port
    path                = local.ready_path
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = local.tags
}

resource "aws_lb_listener" "smtp" {
  # TCP, not TLS: see the top of this file.
  for_each = local.smtp_ports

  load_balancer_arn = aws_lb.this.arn
  port              = each.value
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.smtp[each.key].arn
  }

  tags = local.tags
}
