resource "aws_ecs_cluster" "this" {
  count = local.create_cluster ? 1 : 0

  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  tags = local.tags
}

locals {
  # How the config reaches the relay. ECS can hand an SSM parameter or a secret to a container
  # only as an environment variable, and the relay reads its config and TLS files from disk.
  # So the task overrides the image's entrypoint with one shell line that writes them into the
  # task's private scratch volume (umask 077: readable by the relay user only), removes them
  # from the environment, and execs the relay, which replaces the shell. No init container, no
  # sidecar, no S3 object; the image stays the same one that runs everywhere else.
  entry_script = join(" && ", [
    "umask 077",
    "printf '%s\\n' \"$RELAY_CONFIG_YAML\" > ${local.config_path}",
    "printf '%s\\n' \"$RELAY_TLS_CERT\" > ${local.data_dir}/tls.crt",
    "printf '%s\\n' \"$RELAY_TLS_KEY\" > ${local.data_dir}/tls.key",
    "unset RELAY_CONFIG_YAML RELAY_TLS_CERT RELAY_TLS_KEY",
    "exec relay serve -c ${local.config_path}",
  ])

  relay_container = {
    name      = local.container_name
    image     = var.image
    essential = true
    user      = local.image_user

    entryPoint = ["/bin/sh", "-c"]
    command    = [local.entry_script]

    readonlyRootFilesystem = true
    # The spool is mounted inside the scratch volume, at queue.dir's default.
    mountPoints = concat(
      [{ sourceVolume = "relay-data", containerPath = local.data_dir, readOnly = false }],
      local.use_spool ? [{ sourceVolume = "relay-spool", containerPath = local.spool_dir, readOnly = false }] : [],
    )

    portMappings = [
      { name = "submission", containerPort = local.submission_port, hostPort = local.submission_port, protocol = "tcp" },
      { name = "submissions", containerPort = local.submissions_port, hostPort = local.submissions_port, protocol = "tcp" },
      { name = "metrics", containerPort = local.metrics_port, hostPort = local.metrics_port, protocol = "tcp" },
    ]

    environment = [
      { name = "RELAY_CONFIG", value = local.config_path },
      # The parameter's value is read at task start, so a config change alone would not roll the
      # service: its hash in the task definition makes every change a new revision and deployment.
      { name = "RELAY_CONFIG_SHA256", value = sha256(var.relay_config) },
    ]

    secrets = [
      { name = "RELAY_CONFIG_YAML", valueFrom = aws_ssm_parameter.config.arn },
      { name = "RELAY_TLS_CERT", valueFrom = "${var.tls_secret_arn}:certificate::" },
      { name = "RELAY_TLS_KEY", valueFrom = "${var.tls_secret_arn}:private_key::" },
    ]

    # A non-root process may bind 587/465 once this namespaced sysctl is 0; it changes nothing
    # outside the task's network namespace (the same default Docker applies).
    systemControls = [
      { namespace = "net.ipv4.ip_unprivileged_port_start", value = "0" },
    ]

    linuxParameters = {
      capabilities       = { add = [], drop = ["ALL"] }
      initProcessEnabled = true
    }

    healthCheck = {
      command     = ["CMD", "python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:${local.metrics_port}${local.health_path}', timeout=4).status == 200 else 1)"]
      interval    = 30
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }

    # First SIGTERM drains open SMTP sessions; 120 s is Fargate's maximum.
    stopTimeout = 120

    ulimits = [
      { name = "nofile", softLimit = 65536, hardLimit = 65536 },
    ]

    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.this.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "relay"
      }
    }
  }
}

# One task definition and one service per instance (see local.instances): a single one without
# spool_efs, one per spool with it.
resource "aws_ecs_task_definition" "this" {
  for_each = local.instances

  family                   = each.value.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu
  memory                   = var.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  container_definitions = jsonencode([local.relay_container])

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # Task-scoped scratch space at the image's VOLUME path: ECS copies the image directory's
  # ownership (uid 10001) into it, so the read-only-root container can write there.
  volume {
    name = "relay-data"
  }

  # This instance's spool: its own access point, which also makes every file operation run as
  # uid/gid 10001 whatever the client says, so ownership never drifts between tasks.
  dynamic "volume" {
    for_each = local.use_spool ? [aws_efs_access_point.spool[each.key]] : []
    content {
      name = "relay-spool"
      efs_volume_configuration {
        file_system_id     = var.spool_efs.file_system_id
        transit_encryption = "ENABLED"
        authorization_config {
          access_point_id = volume.value.id
          iam             = "ENABLED"
        }
      }
    }
  }

  tags = local.tags
}

moved {
  from = aws_ecs_task_definition.this
  to   = aws_ecs_task_definition.this["service"]
}

resource "aws_ecs_service" "this" {
  for_each = local.instances

  name             = each.value.name
  cluster          = local.cluster_arn
  task_definition  = aws_ecs_task_definition.this[each.key].arn
  desired_count    = each.value.desired_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  enable_execute_command            = false
  health_check_grace_period_seconds = var.health_check_grace_period_seconds

  # Start new tasks before stopping old ones; a deployment that never turns healthy rolls back.
  # A spool's service does the reverse (stop, then start): two tasks must never share a spool.
  deployment_minimum_healthy_percent = local.use_spool ? 0 : 100
  deployment_maximum_percent         = local.use_spool ? 100 : 200
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.relay.id]
    assign_public_ip = false
  }

  dynamic "load_balancer" {
    for_each = local.smtp_ports
    content {
      target_group_arn = aws_lb_target_group.smtp[load_balancer.key].arn
      container_name   = local.container_name
      container_port   = load_balancer.value
    }
  }

  # Target groups must be attached to a listener before a service can register into them.
  depends_on = [aws_lb_listener.smtp]

  tags = local.tags
}

moved {
  from = aws_ecs_service.this
  to   = aws_ecs_service.this["service"]
}

resource "aws_efs_access_point" "spool" {
  for_each = local.use_spool ? local.instances : {}

  file_system_id = var.spool_efs.file_system_id

  posix_user {
    uid = local.image_uid
    gid = local.image_uid
  }

  root_directory {
    path = "${var.spool_efs.root_directory}/${each.value.name}"
    creation_info {
      owner_uid   = local.image_uid
      owner_gid   = local.image_uid
      permissions = "0700"
    }
  }

  tags = merge(local.tags, { Name = each.value.name })
}
