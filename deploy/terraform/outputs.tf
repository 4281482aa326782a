output "smtp_host" {
  description = "Host name applications use as SMTP_HOST: the private DNS name when one was created, else the NLB's DNS name."
  value       = var.private_zone_id != null ? var.private_dns_name : aws_lb.this.dns_name
}

output "nlb_dns_name" {
  description = "DNS name of the internal NLB."
  value       = aws_lb.this.dns_name
}

output "nlb_arn" {
  description = "ARN of the internal NLB."
  value       = aws_lb.this.arn
}

output "nlb_security_group_id" {
  description = "Security group of the NLB; add client access here (or through the allowed_client_* inputs)."
  value       = aws_security_group.nlb.id
}

output "task_security_group_id" {
  description = "Security group of the relay tasks; reference it from the egress proxy's security group."
  value       = aws_security_group.relay.id
}

output "ecs_cluster_arn" {
  description = "ECS cluster the service runs in."
  value       = local.cluster_arn
}

output "ecs_service_name" {
  description = "Name of the ECS service (with spool_efs: of the first instance's; ecs_service_names has all)."
  value       = values(aws_ecs_service.this)[0].name
}

output "ecs_service_names" {
  description = "Names of the ECS services: one without spool_efs, one per instance with it."
  value       = [for s in aws_ecs_service.this : s.name]
}

output "task_definition_arn" {
  description = "ARN (with revision) of the current task definition (with spool_efs: the first instance's; task_definition_arns has all)."
  value       = values(aws_ecs_task_definition.this)[0].arn
}

output "task_definition_arns" {
  description = "ARNs (with revision) of the current task definitions, by service name."
  value       = { for k, t in aws_ecs_task_definition.this : local.instances[k].name => t.arn }
}

output "spool_access_point_ids" {
  description = "EFS access point of each instance's spool, by service name (empty without spool_efs)."
  value       = { for k, ap in aws_efs_access_point.spool : local.instances[k].name => ap.id }
}

output "task_role_arn" {
  description = "Task role: the identity that reads the DKIM keys and upstream credentials."
  value       = aws_iam_role.task.arn
}

output "execution_role_arn" {
  description = "Execution role: pulls the image, writes logs, injects config and TLS certificate."
  value       = aws_iam_role.execution.arn
}

output "log_group_name" {
  description = "CloudWatch log group of the relay (one JSON line per message)."
  value       = aws_cloudwatch_log_group.this.name
}

output "config_parameter_name" {
  description = "SSM parameter holding the relay config."
  value       = aws_ssm_parameter.config.name
}

output "created_secret_arns" {
  description = "ARNs of the secrets the module created (empty, to be filled out of band), by name."
  value       = { for name, s in aws_secretsmanager_secret.created : name => s.arn }
}

output "dns_records" {
  description = "Fully qualified names of the TXT records the module published (DKIM, SPF, DMARC)."
  value = concat(
    [for r in aws_route53_record.dkim : r.fqdn],
    [for r in aws_route53_record.spf : r.fqdn],
    [for r in aws_route53_record.dmarc : r.fqdn],
  )
}
