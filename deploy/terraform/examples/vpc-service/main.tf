# A relay for every workload in one VPC: ECS Fargate in the private subnets, an internal NLB,
# delivery to Amazon SES through the egress proxy, DKIM keys in Secrets Manager, and the DNS
# records published in Route 53.
#
#   cp terraform.tfvars.example terraform.tfvars   # then edit
#   terraform init && terraform apply
#   relay keygen -d example.com -s s2026 --store aws-sm://relay/dkim/example.com
#     -> put the printed TXT value into dkim_records, apply again.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region
}

module "relay" {
  source = "../.."

  name       = "relay"
  vpc_id     = var.vpc_id
  subnet_ids = var.private_subnet_ids
  image      = var.image

  ecr_repository_arn = var.ecr_repository_arn

  # Holds references only (aws-sm://...): the secrets stay in Secrets Manager.
  relay_config = templatefile("${path.module}/relay.yaml.tftpl", {
    region     = var.region
    proxy_url  = var.egress_proxy_url
    nameserver = var.dns_resolver_ip
  })

  tls_secret_arn                  = var.tls_secret_arn
  upstream_credential_secret_arns = [var.ses_smtp_secret_arn]
  # The DKIM key secret is created here, empty; `relay keygen --store` fills it.
  create_secrets = {
    "relay/dkim/example.com" = "DKIM private key for example.com, selector s2026"
  }

  allowed_client_cidrs = var.app_subnet_cidrs
  monitoring_cidrs     = var.monitoring_cidrs

  egress_proxy_cidrs = var.egress_proxy_cidrs
  egress_proxy_port  = 1080

  aws_api_prefix_list_ids = var.s3_prefix_list_ids

  public_zone_id = var.public_zone_id
  dkim_records   = var.dkim_records
  spf_records = {
    "example.com" = "v=spf1 ip4:${var.egress_ip} include:amazonses.com -all"
  }
  dmarc_records = {
    "example.com" = "v=DMARC1; p=quarantine; adkim=s; aspf=r; rua=mailto:dmarc@example.com"
  }

  private_zone_id  = var.private_zone_id
  private_dns_name = "relay.mail.internal.example.com"

  tags = {
    team = "platform"
  }
}
