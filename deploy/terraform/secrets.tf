# --- The relay config --------------------------------------------------------------------------
#
# A plain String parameter: the config holds no secret, only references to secrets (aws-sm://,
# vault://, file://, env://). The task reads it at start (see ecs.tf for how it becomes a file).

resource "aws_ssm_parameter" "config" {
  #checkov:skip=CKV2_AWS_34:The config holds no secrets, only secret references (PRODUCT.md); a SecureString would add a KMS dependency and hide a reviewable file.
  name        = "/${var.name}/relay.yaml"
  description = "relay configuration (YAML) for ECS service ${var.name}"
  type        = "String"
  # Standard holds 4 KB, Advanced 8 KB: let SSM pick by size.
  tier  = "Intelligent-Tiering"
  value = var.relay_config
  tags  = local.tags

  lifecycle {
    # The NLB, target groups and security groups are built for these ports: a config that binds
    # others would pass `terraform apply` and then fail every health check.
    precondition {
      condition = alltrue([
        for l in try(yamldecode(var.relay_config).listeners, []) :
        contains([tostring(local.submission_port), tostring(local.submissions_port)], reverse(split(":", tostring(l.bind)))[0])
      ])
      error_message = "relay_config listeners must bind port 587 or 465 (the ports the NLB forwards)."
    }
    precondition {
      condition     = try(endswith(tostring(yamldecode(var.relay_config).metrics.bind), ":${local.metrics_port}"), false)
      error_message = "relay_config must set metrics.bind to 0.0.0.0:9464 (health checks and scrapes use it)."
    }
    # A spool on the task's scratch volume would die with the task, and every queued message
    # with it; an EFS spool the relay does not use would be a cost and a false promise.
    precondition {
      condition     = (try(yamldecode(var.relay_config).queue.mode, null) == "spool") == local.use_spool
      error_message = "relay_config queue.mode: spool and spool_efs go together: set both (store-and-forward on EFS) or neither (passthrough)."
    }
    precondition {
      condition     = !local.use_spool || try(yamldecode(var.relay_config).queue.dir, null) == null || try(trimsuffix(yamldecode(var.relay_config).queue.dir, "/"), "") == local.spool_dir
      error_message = "relay_config queue.dir must be /var/lib/relay/spool (or unset): the EFS spool is mounted there."
    }
  }
}

# --- Optional secrets, created empty -----------------------------------------------------------
#
# Terraform state stores every attribute in plain text, so a secret value set here (an
# aws_secretsmanager_secret_version, or a generated key) would sit in the state file of
# everyone who can read it. The module therefore creates only the secret: its name, policy
# target and KMS key. The value is put once, out of band, by whoever holds it:
#   relay keygen -d example.com -s s2026 --store aws-sm://relay/dkim/example.com
#   aws secretsmanager put-secret-value --secret-id relay/upstream --secret-string file://creds.json
# Until then the relay reports the key as missing on /readyz and `relay check`.

resource "aws_secretsmanager_secret" "created" {
  #checkov:skip=CKV2_AWS_57:DKIM keys rotate by publishing a new selector in DNS first (relay keygen, then the config), which a rotation Lambda cannot do; upstream credentials rotate at their provider.
  #checkov:skip=CKV_AWS_149:A customer managed key is optional (var.secrets_kms_key_arn); without one Secrets Manager encrypts with its AWS managed key.
  for_each = var.create_secrets

  name        = each.key
  description = each.value
  kms_key_id  = var.secrets_kms_key_arn
  tags        = local.tags
}
