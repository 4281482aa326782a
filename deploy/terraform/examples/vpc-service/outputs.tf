output "smtp_host" {
  description = "Set SMTP_HOST to this, port 587 (STARTTLS) or 465 (TLS)."
  value       = module.relay.smtp_host
}

output "task_security_group_id" {
  description = "Allow this group on the egress proxy."
  value       = module.relay.task_security_group_id
}

output "dkim_secret_arns" {
  description = "Secrets to fill with relay keygen --store."
  value       = module.relay.created_secret_arns
}

output "log_group_name" {
  description = "Where the relay's per-message log lines go."
  value       = module.relay.log_group_name
}
