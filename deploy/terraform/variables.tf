# ---------------------------------------------------------------------------------------------
# Identity and placement
# ---------------------------------------------------------------------------------------------

variable "name" {
  description = "Name of the service; prefixes every resource (ECS service, NLB, target groups, roles, log group, SSM parameter)."
  type        = string
  default     = "relay"

  validation {
    # Target group names are "<name>-<port>" and must fit in 32 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{0,22}[a-z0-9]$", var.name))
    error_message = "name must be 2-24 characters of lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource the module creates."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "VPC the relay runs in."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the tasks and the internal NLB; give one per availability zone, at least two for a highly available service."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 1 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids must be a non-empty list of subnet ids (subnet-...)."
  }
}

# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

variable "image" {
  description = "Container image of the relay, pinned by tag or digest (e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/relay:0.1.0)."
  type        = string

  validation {
    condition     = can(regex("(:[A-Za-z0-9_][A-Za-z0-9_.-]*|@sha256:[0-9a-f]{64})$", var.image)) && !endswith(var.image, ":latest")
    error_message = "image must carry an explicit tag other than latest, or a sha256 digest."
  }
}

variable "ecr_repository_arn" {
  description = "ARN of the ECR repository holding the image. When set, the execution role may pull from exactly that repository; leave null for a public registry."
  type        = string
  default     = null

  validation {
    condition     = var.ecr_repository_arn == null || can(regex("^arn:aws[a-z-]*:ecr:[a-z0-9-]+:[0-9]{12}:repository/.+$", var.ecr_repository_arn))
    error_message = "ecr_repository_arn must be an ECR repository ARN."
  }
}

variable "cpu" {
  description = "Fargate task CPU units."
  type        = number
  default     = 512

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.cpu)
    error_message = "cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "memory" {
  description = "Fargate task memory in MiB; must be a valid pairing with cpu."
  type        = number
  default     = 1024

  validation {
    condition     = var.memory >= 512 && var.memory <= 30720
    error_message = "memory must be between 512 and 30720 MiB."
  }
}

variable "cpu_architecture" {
  description = "CPU architecture of the tasks: X86_64 or ARM64 (the image must be built for it)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

variable "desired_count" {
  description = "Number of relay tasks. Two or more keep the service up through deployments and an AZ loss."
  type        = number
  default     = 2

  validation {
    condition     = var.desired_count >= 1 && floor(var.desired_count) == var.desired_count
    error_message = "desired_count must be a positive whole number."
  }
}

variable "ecs_cluster_arn" {
  description = "Existing ECS cluster to run in. When null the module creates a cluster named after var.name, with Container Insights on."
  type        = string
  default     = null
}

variable "health_check_grace_period_seconds" {
  description = "Seconds ECS ignores NLB health checks after a task starts (the relay loads keys and probes the upstream before /readyz turns 200)."
  type        = number
  default     = 60

  validation {
    condition     = var.health_check_grace_period_seconds >= 0 && var.health_check_grace_period_seconds <= 2147483647
    error_message = "health_check_grace_period_seconds must be non-negative."
  }
}

# ---------------------------------------------------------------------------------------------
# Configuration and secrets
# ---------------------------------------------------------------------------------------------

variable "relay_config" {
  description = <<-EOT
    The relay configuration (YAML, the shape in PRODUCT.md). It holds no secrets, only secret
    references. Stored in an SSM parameter and written by the task to /var/lib/relay/relay.yaml.
    Listeners must bind 587 and 465 and metrics 0.0.0.0:9464; TLS must point at
    /var/lib/relay/tls.crt and /var/lib/relay/tls.key (written from tls_secret_arn).
  EOT
  type        = string

  validation {
    condition     = can(yamldecode(var.relay_config).listeners)
    error_message = "relay_config must be YAML with a listeners list."
  }
}

variable "tls_secret_arn" {
  description = "Secrets Manager secret (full ARN) holding the listeners' certificate as JSON {\"certificate\": PEM chain, \"private_key\": PEM key}. ECS injects it at start (execution role)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", var.tls_secret_arn))
    error_message = "tls_secret_arn must be a full Secrets Manager secret ARN (wildcards are not accepted)."
  }
}

variable "dkim_key_secret_arns" {
  description = "Full ARNs of the Secrets Manager secrets holding DKIM private keys (the aws-sm:// references in relay_config). The task role may read exactly these."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.dkim_key_secret_arns : can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", a))])
    error_message = "dkim_key_secret_arns must be full Secrets Manager secret ARNs (wildcards are not accepted)."
  }
}

variable "upstream_credential_secret_arns" {
  description = "Full ARNs of the Secrets Manager secrets holding upstream (smarthost) credentials and client password references. The task role may read exactly these."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.upstream_credential_secret_arns : can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+$", a))])
    error_message = "upstream_credential_secret_arns must be full Secrets Manager secret ARNs (wildcards are not accepted)."
  }
}

variable "secrets_kms_key_arn" {
  description = "Customer managed KMS key encrypting those secrets. When set, both roles get kms:Decrypt on it, only via Secrets Manager, and secrets created by the module use it."
  type        = string
  default     = null

  validation {
    condition     = var.secrets_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.secrets_kms_key_arn))
    error_message = "secrets_kms_key_arn must be a KMS key ARN."
  }
}

variable "create_secrets" {
  description = <<-EOT
    Secrets Manager secrets to create, name => description (e.g. {"relay/dkim/example.com" =
    "DKIM key s2026"}). The module creates the secret only, never a value, so no key material
    enters Terraform state; put the value with `relay keygen --store aws-sm://NAME` or
    `aws secretsmanager put-secret-value`. The task role may read them.
  EOT
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Network access
# ---------------------------------------------------------------------------------------------

variable "allowed_client_cidrs" {
  description = "CIDRs that may connect to 587/465 on the NLB (the applications' subnets)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.allowed_client_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "allowed_client_cidrs must be valid CIDRs, and not 0.0.0.0/0."
  }
}

variable "allowed_client_security_group_ids" {
  description = "Security groups whose members may connect to 587/465 on the NLB."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for g in var.allowed_client_security_group_ids : can(regex("^sg-[0-9a-f]+$", g))])
    error_message = "allowed_client_security_group_ids must be security group ids (sg-...)."
  }
}

variable "monitoring_cidrs" {
  description = "CIDRs of the Prometheus scrapers allowed to reach the metrics port (9464) on the tasks."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.monitoring_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "monitoring_cidrs must be valid CIDRs, and not 0.0.0.0/0."
  }
}

variable "egress_proxy_cidrs" {
  description = "CIDRs of the egress proxy (SOCKS5 or HTTP CONNECT) named in upstream.proxy. When set, the tasks reach the outside only through it."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.egress_proxy_cidrs : can(cidrhost(c, 0))])
    error_message = "egress_proxy_cidrs must be valid CIDRs."
  }
}

variable "egress_proxy_port" {
  description = "TCP port of the egress proxy."
  type        = number
  default     = 1080

  validation {
    condition     = var.egress_proxy_port >= 1 && var.egress_proxy_port <= 65535
    error_message = "egress_proxy_port must be a TCP port."
  }
}

variable "upstream_cidrs" {
  description = "Only without a proxy: CIDRs of the smarthost or, in mx mode, the MX hosts (0.0.0.0/0). Ignored when egress_proxy_cidrs is set."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.upstream_cidrs : can(cidrhost(c, 0))])
    error_message = "upstream_cidrs must be valid CIDRs."
  }
}

variable "upstream_ports" {
  description = "Only without a proxy: TCP ports of the upstream (587 smarthost STARTTLS, 465 implicit TLS, 25 MX)."
  type        = list(number)
  default     = [587]

  validation {
    condition     = alltrue([for p in var.upstream_ports : p >= 1 && p <= 65535])
    error_message = "upstream_ports must be TCP ports."
  }
}

variable "dns_resolver_cidrs" {
  description = "DNS resolvers the relay queries (dns.nameservers in the config). Null means the VPC resolver at the VPC CIDR base + 2."
  type        = list(string)
  default     = null

  validation {
    condition     = var.dns_resolver_cidrs == null ? true : alltrue([for c in var.dns_resolver_cidrs : can(cidrhost(c, 0))])
    error_message = "dns_resolver_cidrs must be valid CIDRs."
  }
}

variable "aws_api_cidrs" {
  description = "Where the tasks reach AWS APIs on 443 (ECR, CloudWatch Logs, SSM, Secrets Manager, KMS): the interface VPC endpoints' subnets. Null means the VPC CIDR. Through a NAT gateway instead, give 0.0.0.0/0."
  type        = list(string)
  default     = null

  validation {
    condition     = var.aws_api_cidrs == null ? true : alltrue([for c in var.aws_api_cidrs : can(cidrhost(c, 0))])
    error_message = "aws_api_cidrs must be valid CIDRs."
  }
}

variable "aws_api_prefix_list_ids" {
  description = "Managed prefix lists reached on 443, typically the S3 gateway endpoint's (ECR stores image layers in S3)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for p in var.aws_api_prefix_list_ids : can(regex("^pl-[0-9a-f]+$", p))])
    error_message = "aws_api_prefix_list_ids must be prefix list ids (pl-...)."
  }
}

# ---------------------------------------------------------------------------------------------
# Load balancer and logs
# ---------------------------------------------------------------------------------------------

variable "deletion_protection" {
  description = "Protect the NLB from deletion. Turn off only to destroy the stack."
  type        = bool
  default     = true
}

variable "nlb_access_logs" {
  description = "S3 bucket (and prefix) for NLB access logs. NLBs log TLS listeners only, so with TCP listeners this records nothing useful; null disables it."
  type = object({
    bucket = string
    prefix = optional(string, "relay-nlb")
  })
  default = null
}

variable "log_retention_days" {
  description = "Retention of the relay's CloudWatch log group (one JSON line per message)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ..., 365, ..., 3653)."
  }
}

variable "log_kms_key_arn" {
  description = "KMS key to encrypt the log group with; null uses CloudWatch Logs' own encryption. The key policy must allow the logs service principal."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------------------------
# DNS (optional)
# ---------------------------------------------------------------------------------------------

variable "public_zone_id" {
  description = "Route 53 public hosted zone for the sending domains' DKIM, SPF and DMARC records. Null publishes nothing."
  type        = string
  default     = null
}

variable "dkim_records" {
  description = "DKIM public keys to publish, as printed by `relay keygen`: the TXT value (v=DKIM1; k=...; p=...) per domain and selector."
  type = list(object({
    domain   = string
    selector = string
    value    = string
  }))
  default = []

  validation {
    condition     = alltrue([for r in var.dkim_records : startswith(r.value, "v=DKIM1")])
    error_message = "Each dkim_records value must be the TXT value starting with v=DKIM1 (RFC 6376 §3.6.1)."
  }
}

variable "spf_records" {
  description = "SPF TXT values per domain (domain => \"v=spf1 ip4:<egress IP> include:... -all\"). The module must own that name's TXT record set: merge other TXT values into it."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for v in values(var.spf_records) : startswith(v, "v=spf1 ")])
    error_message = "Each spf_records value must start with \"v=spf1 \" (RFC 7208 §4.5)."
  }
}

variable "dmarc_records" {
  description = "DMARC TXT values per domain (domain => \"v=DMARC1; p=quarantine; rua=mailto:...\"), published at _dmarc.<domain>."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for v in values(var.dmarc_records) : startswith(v, "v=DMARC1")])
    error_message = "Each dmarc_records value must start with v=DMARC1 (RFC 7489 §6.3)."
  }
}

variable "private_zone_id" {
  description = "Route 53 private hosted zone for the relay's internal name. Null creates no record."
  type        = string
  default     = null
}

variable "private_dns_name" {
  description = "Internal name the applications use as SMTP_HOST (e.g. relay.mail.internal.example.com); an alias to the NLB in private_zone_id."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------------------------
# Store-and-forward spool (optional)
# ---------------------------------------------------------------------------------------------

variable "spool_efs" {
  description = <<-EOT
    EFS file system for the store-and-forward spool (relay_config `queue.mode: spool`, whose
    `queue.dir` must stay /var/lib/relay/spool). Null (the default) runs the relay stateless, in
    passthrough mode. When set, each of the desired_count relay instances is its own ECS service
    of one task with its own EFS access point (directory <root_directory>/<name>-<n>, uid/gid
    10001, mode 0700): one spool per instance, which the replacement task of that instance
    takes over. Such a service stops its old task before starting the new one, so two tasks
    never share a spool. The file system's mount targets must admit NFS (TCP 2049) from the
    task_security_group_id output.
  EOT
  type = object({
    file_system_id                 = string
    mount_target_security_group_id = string
    root_directory                 = optional(string, "/relay-spool")
  })
  default = null

  validation {
    condition = var.spool_efs == null ? true : (
      can(regex("^fs-[0-9a-f]+$", var.spool_efs.file_system_id)) &&
      can(regex("^sg-[0-9a-f]+$", var.spool_efs.mount_target_security_group_id)) &&
      can(regex("^(/[A-Za-z0-9_.-]+)+$", var.spool_efs.root_directory))
    )
    error_message = "spool_efs needs file_system_id fs-..., mount_target_security_group_id sg-..., and an absolute root_directory without a trailing slash."
  }
}
