resource "aws_cloudwatch_log_group" "this" {
  #checkov:skip=CKV_AWS_158:A customer managed key is optional (var.log_kms_key_arn); CloudWatch Logs encrypts at rest regardless, and the relay logs no bodies and no secrets (PRODUCT.md, Observability).
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.log_kms_key_arn
  tags              = local.tags
}
