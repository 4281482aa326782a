variable "region" {
  description = "AWS region."
  type        = string
}

variable "vpc_id" {
  description = "The VPC to serve."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets for the relay and its NLB, one per availability zone."
  type        = list(string)
}

variable "app_subnet_cidrs" {
  description = "CIDRs of the application subnets allowed to send mail."
  type        = list(string)
}

variable "monitoring_cidrs" {
  description = "CIDRs of the Prometheus scrapers."
  type        = list(string)
  default     = []
}

variable "image" {
  description = "relay image, pinned by tag or digest."
  type        = string
}

variable "ecr_repository_arn" {
  description = "ECR repository of the image (null for a public registry)."
  type        = string
  default     = null
}

variable "tls_secret_arn" {
  description = "Secrets Manager secret with the listener certificate: JSON {certificate, private_key}."
  type        = string
}

variable "ses_smtp_secret_arn" {
  description = "Secrets Manager secret relay/upstream: JSON {password, billing_password}."
  type        = string
}

variable "egress_proxy_url" {
  description = "Egress proxy URL written into the relay config (socks5h://host:port)."
  type        = string
}

variable "egress_proxy_cidrs" {
  description = "CIDRs of the egress proxy."
  type        = list(string)
}

variable "egress_ip" {
  description = "Public IP the egress proxy sends from; published in SPF."
  type        = string
}

variable "dns_resolver_ip" {
  description = "The VPC resolver (VPC CIDR base + 2)."
  type        = string
}

variable "s3_prefix_list_ids" {
  description = "Prefix list of the S3 gateway endpoint (ECR image layers)."
  type        = list(string)
  default     = []
}

variable "public_zone_id" {
  description = "Public hosted zone of example.com; null publishes no records."
  type        = string
  default     = null
}

variable "private_zone_id" {
  description = "Private hosted zone for relay.mail.internal.example.com; null creates no record."
  type        = string
  default     = null
}

variable "dkim_records" {
  description = "DKIM TXT values printed by relay keygen."
  type = list(object({
    domain   = string
    selector = string
    value    = string
  }))
  default = []
}
