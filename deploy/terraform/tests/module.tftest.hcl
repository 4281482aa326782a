# What the module promises, checked on plans against a mocked AWS provider (no credentials, no
# network): `terraform test` in deploy/terraform. tests/test_terraform.py runs it.

mock_provider "aws" {
  # Mock values for computed attributes (ARNs, ids) at plan time too, so assertions on a plan
  # can read them.
  override_during = plan

  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_vpc" {
    defaults = { cidr_block = "10.0.0.0/16" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:relay" }
  }
  mock_resource "aws_ssm_parameter" {
    defaults = { arn = "arn:aws:ssm:eu-west-1:123456789012:parameter/relay/relay.yaml" }
  }
  mock_resource "aws_efs_access_point" {
    defaults = { id = "fsap-0123456789abcdef0", arn = "arn:aws:elasticfilesystem:eu-west-1:123456789012:access-point/fsap-0123456789abcdef0" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
}

variables {
  vpc_id                          = "vpc-0123456789abcdef0"
  subnet_ids                      = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"]
  image                           = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/relay:0.1.0"
  relay_config                    = <<-EOT
    listeners:
      - {name: submission, bind: "0.0.0.0:587", tls: starttls, auth: required}
      - {name: submissions, bind: "0.0.0.0:465", tls: implicit, auth: required}
    metrics: {bind: "0.0.0.0:9464"}
  EOT
  tls_secret_arn                  = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/tls-AbCdEf"
  dkim_key_secret_arns            = ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/dkim/example.com-GhIjKl"]
  upstream_credential_secret_arns = ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/upstream-MnOpQr"]
  allowed_client_cidrs            = ["10.0.32.0/19"]
  egress_proxy_cidrs              = ["10.0.250.10/32"]
  egress_proxy_port               = 1080
  dns_resolver_cidrs              = ["10.0.0.2/32"]
}

# --- The load balancer ------------------------------------------------------------------------

run "nlb_forwards_587_and_465_as_plain_tcp" {
  command = plan

  assert {
    condition     = aws_lb.this.internal && aws_lb.this.load_balancer_type == "network"
    error_message = "the NLB must be internal"
  }
  assert {
    condition     = { for k, l in aws_lb_listener.smtp : k => "${l.protocol}:${l.port}" } == { submission = "TCP:587", submissions = "TCP:465" }
    error_message = "listeners must be TCP 587 and TCP 465 (TLS terminates in the relay: STARTTLS cannot be offloaded)"
  }
  assert {
    condition     = alltrue([for tg in aws_lb_target_group.smtp : tg.preserve_client_ip == "true" && tg.health_check[0].path == "/readyz" && tg.health_check[0].port == "9464"])
    error_message = "target groups must keep client addresses and route on /readyz at 9464"
  }
}

# --- Security groups: the way out ------------------------------------------------------------

run "tasks_reach_only_the_proxy_dns_and_aws_apis" {
  command = plan

  variables {
    upstream_cidrs = ["0.0.0.0/0"] # ignored: with a proxy, only the proxy goes out
  }

  assert {
    condition     = [for r in aws_vpc_security_group_egress_rule.relay_to_proxy : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.cidr_ipv4}"] == ["tcp/1080-1080 10.0.250.10/32"]
    error_message = "the tasks must reach the proxy on its port only"
  }
  assert {
    condition     = length(aws_vpc_security_group_egress_rule.relay_to_upstream) == 0
    error_message = "with a proxy, no rule may open the upstream directly (mail would leave from an address SPF does not list)"
  }
  assert {
    condition = toset(concat(
      [for r in aws_vpc_security_group_egress_rule.relay_dns_udp : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.cidr_ipv4}"],
      [for r in aws_vpc_security_group_egress_rule.relay_dns_tcp : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.cidr_ipv4}"],
    )) == toset(["udp/53-53 10.0.0.2/32", "tcp/53-53 10.0.0.2/32"])
    error_message = "DNS must go to the configured resolver only"
  }
  assert {
    condition     = [for r in aws_vpc_security_group_egress_rule.relay_aws_api : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.cidr_ipv4}"] == ["tcp/443-443 10.0.0.0/16"]
    error_message = "AWS APIs (ECR, Logs, SSM, Secrets Manager) only on 443 inside the VPC (its interface endpoints) by default"
  }
  assert {
    condition     = length(aws_vpc_security_group_egress_rule.relay_aws_api_prefix_list) == 0 && length(aws_vpc_security_group_egress_rule.relay_spool_efs) == 0
    error_message = "no prefix-list or EFS rule unless asked for"
  }
  assert {
    condition = alltrue([for r in [
      aws_vpc_security_group_egress_rule.nlb_to_relay_submission,
      aws_vpc_security_group_egress_rule.nlb_to_relay_submissions,
      aws_vpc_security_group_egress_rule.nlb_to_relay_health,
    ] : r.from_port == r.to_port && contains([587, 465, 9464], r.from_port) && r.cidr_ipv4 == null])
    error_message = "the NLB may send only to the tasks' group, on 587, 465 and 9464"
  }
}

run "without_a_proxy_only_the_listed_upstream_is_open" {
  command = plan

  variables {
    egress_proxy_cidrs = []
    upstream_cidrs     = ["198.51.100.25/32"]
    upstream_ports     = [587]
  }

  assert {
    condition     = length(aws_vpc_security_group_egress_rule.relay_to_proxy) == 0
    error_message = "no proxy rule without a proxy"
  }
  assert {
    condition     = [for r in aws_vpc_security_group_egress_rule.relay_to_upstream : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.cidr_ipv4}"] == ["tcp/587-587 198.51.100.25/32"]
    error_message = "direct delivery opens exactly the listed upstream and port"
  }
}

# --- IAM: exactly the named secrets -----------------------------------------------------------

run "roles_read_only_the_named_secrets" {
  command = plan

  assert {
    condition     = [for s in data.aws_iam_policy_document.task.statement : s.sid] == ["ReadRelaySecrets"]
    error_message = "the task role reads secrets and does nothing else"
  }
  assert {
    condition = toset(data.aws_iam_policy_document.task.statement[0].resources) == toset([
      "arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/dkim/example.com-GhIjKl",
      "arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/upstream-MnOpQr",
    ]) && toset(data.aws_iam_policy_document.task.statement[0].actions) == toset(["secretsmanager:GetSecretValue"])
    error_message = "the task role may read exactly the DKIM and upstream secrets listed"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.execution.statement : s.resources if s.sid == "ReadTlsCertificate"]) == toset([var.tls_secret_arn])
    error_message = "the execution role may read exactly the TLS secret"
  }
  assert {
    condition     = alltrue([for s in data.aws_iam_policy_document.execution.statement : !contains(tolist(s.resources), "*")])
    error_message = "no wildcard resource (the ECR login, which needs one, is only there with ecr_repository_arn)"
  }
}

run "no_secrets_no_task_policy" {
  command = plan

  variables {
    dkim_key_secret_arns            = []
    upstream_credential_secret_arns = []
  }

  assert {
    condition     = length(aws_iam_role_policy.task) == 0
    error_message = "a task role with nothing to read has no policy"
  }
}

# --- The spool on EFS -------------------------------------------------------------------------

run "spool_on_efs_gives_each_instance_its_own_access_point" {
  command = plan

  variables {
    desired_count = 3
    spool_efs = {
      file_system_id                 = "fs-0123456789abcdef0"
      mount_target_security_group_id = "sg-0123456789abcdef0"
    }
    relay_config = <<-EOT
      listeners:
        - {name: submission, bind: "0.0.0.0:587", tls: starttls, auth: required}
      metrics: {bind: "0.0.0.0:9464"}
      queue: {mode: spool, dir: /var/lib/relay/spool}
    EOT
  }

  assert {
    condition     = sort([for s in aws_ecs_service.this : s.name]) == tolist(["relay-0", "relay-1", "relay-2"]) && alltrue([for s in aws_ecs_service.this : s.desired_count == 1])
    error_message = "one service of one task per spool"
  }
  assert {
    condition     = alltrue([for s in aws_ecs_service.this : s.deployment_maximum_percent == 100 && s.deployment_minimum_healthy_percent == 0])
    error_message = "a spool's old task must stop before its new one starts"
  }
  assert {
    condition     = sort([for ap in aws_efs_access_point.spool : ap.root_directory[0].path]) == tolist(["/relay-spool/relay-0", "/relay-spool/relay-1", "/relay-spool/relay-2"])
    error_message = "one directory per instance"
  }
  assert {
    condition = alltrue([for ap in aws_efs_access_point.spool :
      ap.posix_user[0].uid == 10001 && ap.posix_user[0].gid == 10001 &&
      ap.root_directory[0].creation_info[0].owner_uid == 10001 && ap.root_directory[0].creation_info[0].permissions == "0700"
    ])
    error_message = "the spool belongs to the image's uid 10001, and to nobody else"
  }
  assert {
    condition = alltrue(flatten([for t in aws_ecs_task_definition.this : [
      for v in t.volume : [for efs in v.efs_volume_configuration :
        efs.file_system_id == "fs-0123456789abcdef0" && efs.transit_encryption == "ENABLED" && efs.authorization_config[0].iam == "ENABLED"
      ] if v.name == "relay-spool"
    ]])) && length(flatten([for t in aws_ecs_task_definition.this : [for v in t.volume : v.efs_volume_configuration]])) == 3
    error_message = "every task mounts the spool over TLS with IAM authorization"
  }
  assert {
    condition     = contains([for m in jsondecode(aws_ecs_task_definition.this["spool-0"].container_definitions)[0].mountPoints : m.containerPath], "/var/lib/relay/spool")
    error_message = "the spool is mounted at queue.dir"
  }
  assert {
    condition     = [for r in aws_vpc_security_group_egress_rule.relay_spool_efs : "${r.ip_protocol}/${r.from_port}-${r.to_port} ${r.referenced_security_group_id}"] == ["tcp/2049-2049 sg-0123456789abcdef0"]
    error_message = "NFS only to the mount targets' group"
  }
}

run "without_spool_efs_one_stateless_service" {
  command = plan

  assert {
    condition     = keys(aws_ecs_service.this) == ["service"] && aws_ecs_service.this["service"].desired_count == 2 && length(aws_efs_access_point.spool) == 0
    error_message = "passthrough: one service of desired_count tasks, no EFS"
  }
  assert {
    condition     = alltrue([for v in aws_ecs_task_definition.this["service"].volume : v.name != "relay-spool"])
    error_message = "no spool volume without spool_efs"
  }
}

run "a_spool_needs_efs" {
  command = plan

  variables {
    relay_config = <<-EOT
      listeners:
        - {name: submission, bind: "0.0.0.0:587", tls: starttls, auth: required}
      metrics: {bind: "0.0.0.0:9464"}
      queue: {mode: spool}
    EOT
  }

  expect_failures = [aws_ssm_parameter.config]
}

run "the_efs_spool_is_at_queue_dir" {
  command = plan

  variables {
    spool_efs = {
      file_system_id                 = "fs-0123456789abcdef0"
      mount_target_security_group_id = "sg-0123456789abcdef0"
    }
    relay_config = <<-EOT
      listeners:
        - {name: submission, bind: "0.0.0.0:587", tls: starttls, auth: required}
      metrics: {bind: "0.0.0.0:9464"}
      queue: {mode: spool, dir: /srv/spool}
    EOT
  }

  expect_failures = [aws_ssm_parameter.config]
}

# --- Inputs the module refuses ----------------------------------------------------------------

# One plan for every refused input (each plan costs seconds): expect_failures fails the run
# unless every variable listed reports its validation error.
run "refuses_bad_inputs" {
  command = plan
  variables {
    name                            = "Relay_Prod"
    vpc_id                          = "my-vpc"
    subnet_ids                      = []
    image                           = "registry.example.com/relay:latest"
    tls_secret_arn                  = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:*"
    dkim_key_secret_arns            = ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:relay/*"]
    upstream_credential_secret_arns = ["relay/upstream"]
    allowed_client_cidrs            = ["0.0.0.0/0"]
    monitoring_cidrs                = ["10.0.0.0/33"]
    cpu                             = 300
    desired_count                   = 1.5
    egress_proxy_port               = 70000
    log_retention_days              = 2
    dkim_records                    = [{ domain = "example.com", selector = "s1", value = "k=rsa; p=MIIB" }]
    spf_records                     = { "example.com" = "ip4:203.0.113.10 -all" }
    dmarc_records                   = { "example.com" = "p=reject" }
    spool_efs = {
      file_system_id                 = "efs-prod"
      mount_target_security_group_id = "sg-0123456789abcdef0"
    }
  }
  expect_failures = [
    var.name, var.vpc_id, var.subnet_ids, var.image,
    var.tls_secret_arn, var.dkim_key_secret_arns, var.upstream_credential_secret_arns,
    var.allowed_client_cidrs, var.monitoring_cidrs,
    var.cpu, var.desired_count, var.egress_proxy_port, var.log_retention_days,
    var.dkim_records, var.spf_records, var.dmarc_records, var.spool_efs,
  ]
}

run "refuses_a_config_on_other_ports" {
  command = plan
  variables {
    relay_config = <<-EOT
      listeners:
        - {name: submission, bind: "0.0.0.0:2525", tls: starttls, auth: required}
      metrics: {bind: "0.0.0.0:9100"}
    EOT
  }
  expect_failures = [aws_ssm_parameter.config]
}
